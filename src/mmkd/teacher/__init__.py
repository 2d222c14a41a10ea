"""Teachers as target providers: a frozen model run online, or embeddings computed once and looked up."""
