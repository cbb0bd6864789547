from regdit.cli import main

main()
