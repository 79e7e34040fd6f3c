//! The unit tests of the upgrade script assembler, which is part of the build script
//! (build.rs) and so has no test target of its own.

#[path = "../build/upgrade_script.rs"]
#[allow(dead_code)]
mod upgrade_script;
