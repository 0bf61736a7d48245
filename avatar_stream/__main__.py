from avatar_stream.tools.cli import main

main()
