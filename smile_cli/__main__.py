from smile_cli.cli import main

main()
