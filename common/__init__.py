"""cxr-fl: the ML core shared by server, client and simulation. No Flower imports here."""
