"""What QA reads: the sample store of inspected products, the HTML report."""
