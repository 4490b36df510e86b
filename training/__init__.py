"""Train the plain and MaxMin CNNs on a company's images and write the PoC comparison report."""
