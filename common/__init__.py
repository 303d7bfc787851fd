"""Small helpers every folder may import; this package imports no other folder of this repository."""
