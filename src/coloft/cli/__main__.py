from coloft.cli.main import main

main()
