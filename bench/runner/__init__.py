"""From a command line to finished cells: config composition and checks, grid expansion, cell identity, the cell lifecycle, launchers, storage."""
