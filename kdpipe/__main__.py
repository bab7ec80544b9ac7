from kdpipe.cli import main

main()
