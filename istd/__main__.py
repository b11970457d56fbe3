from istd.cli import main

main()
