"""Datasets: download, verify and extract archives (fetch); later, index the image folders."""
