"""Pure-PyTorch implementations: the executable spec and the test oracle of every op."""
