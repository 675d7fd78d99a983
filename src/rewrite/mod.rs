//! StableHLO graph rewrite: parser, printer and passes.
