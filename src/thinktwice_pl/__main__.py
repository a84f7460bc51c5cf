from thinktwice_pl.cli import main

main()
