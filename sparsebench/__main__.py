from sparsebench.cli import app

app()
