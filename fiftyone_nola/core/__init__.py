"""Pure logic (no FiftyOne imports): maths and orderings the FiftyOne-aware stages build on."""
