"""IIS, the inherent interpretability score of a backbone (specs/iis.md): concepts, heads, the score."""
