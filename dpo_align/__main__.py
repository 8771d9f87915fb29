from dpo_align.cli import main

main()
