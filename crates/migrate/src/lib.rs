//! ferry-migrate
