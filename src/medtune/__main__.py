from medtune.cli import run_cli

run_cli()
