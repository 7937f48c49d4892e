"""What the benchmark groups share: data sets, models, test problems, output and progress."""
