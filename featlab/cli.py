"""featlab's command line (placeholder until the full CLI lands)."""
def main():
    print("featlab")
