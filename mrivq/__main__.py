from mrivq.cli.app import main

main()
