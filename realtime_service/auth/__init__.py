"""Who is calling (token verification) and whether they may watch a diagnosis (ownership)."""
