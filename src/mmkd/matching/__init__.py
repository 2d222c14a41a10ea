"""Binary image–text matching (S2's study): a teacher with a matching head, a ResNet+MiniLM student, KD."""
