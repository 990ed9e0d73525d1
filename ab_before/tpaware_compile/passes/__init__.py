"""Graph passes of the tpaware backend: canonicalize -> match -> rewrite (-> lower, owned elsewhere)."""
