//! mongo
