"""open_clip surgery for LIFT+: tuners, classifiers, initialisation and losses."""
