"""(placeholder: see the issue that builds this package)"""
