"""Shipped compression profiles (TOML). Copy one, edit it, and pass its path as the profile."""
