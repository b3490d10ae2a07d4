from hms_mgmt.cli import app

app()
