def convert(*a, **k): raise NotImplementedError
def revert(*a, **k): raise NotImplementedError
