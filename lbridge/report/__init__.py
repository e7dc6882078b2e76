"""What `lbridge report` and `lbridge reproduce` write: tables (csv/md/tex), a Pareto plot, image grids."""
