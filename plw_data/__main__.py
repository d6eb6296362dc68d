"""`python -m plw_data` is `plw-data`."""

from plw_data.cli.main import app

app(prog_name="plw-data")
