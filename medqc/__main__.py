from medqc.cli import main

if __name__ == "__main__":  # not when a spawned child process imports the parent's main module
    raise SystemExit(main())
