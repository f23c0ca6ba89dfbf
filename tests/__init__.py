# A regular package: verl 0.9 installs a top-level `tests` package into site-packages, which would shadow
# this folder as a namespace package.
