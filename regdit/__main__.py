from regdit.commands.cli import main

main()
