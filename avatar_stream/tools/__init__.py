"""The command line: ``avatar-stream`` (``cli``), ``doctor``, offline ``render``, and the
``serve`` options for speech, access and limits."""
