"""Stochastic-gradient matrix factorization on Spark: MascotMF and PrunedMF share this package."""
