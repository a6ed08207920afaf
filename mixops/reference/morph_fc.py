"""placeholder: replaced by the family work"""
