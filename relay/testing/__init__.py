"""Test doubles that speak the real wire protocols, for the test suite and `relay demo`."""
