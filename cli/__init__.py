"""Typer command-line apps; installed as plw_data.cli."""
