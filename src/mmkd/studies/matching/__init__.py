"""Binary image–text matching (the matching study): a teacher with a matching head, a ResNet+MiniLM student, KD."""
