"""Embedded demo data: small original datasets for the README's first command."""
