"""Training side: good images -> deployable bundle. Needs torch; never imported at run time."""
