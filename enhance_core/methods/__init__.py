"""The methods, one module (or package) each; none imports another."""
