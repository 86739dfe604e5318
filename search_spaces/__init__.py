"""Built-in search spaces (YAML). Copy one, edit it, and pass its path to --space."""
