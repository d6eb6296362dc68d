"""`python -m plw_data` is `plw-data`."""

from plw_data.cli.main import main

main()
