//! Assembles the upgrade scripts (`sql/upgrade/*.sql` → `sql/`): see build/upgrade_script.rs.

#[path = "build/upgrade_script.rs"]
mod upgrade_script;

use std::fs;
use std::path::Path;
use upgrade_script::{assemble, statements, Statement};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let read = |path: &str| fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"));
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=sql/upgrade");
    // the sql/ files in the order src/lib.rs loads them
    let lib = read("src/lib.rs")?;
    let files: Vec<String> = lib
        .split("\"../")
        .skip(1)
        .filter_map(|s| s.split_once('"').map(|(path, _)| path.to_string()))
        .filter(|path| path.starts_with("sql/") && path.ends_with(".sql"))
        .collect();
    if files.is_empty() {
        return Err("src/lib.rs names no sql/ file".into());
    }
    let texts = files
        .iter()
        .map(|f| {
            println!("cargo:rerun-if-changed={f}");
            read(f)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut sql = Vec::new();
    for (file, text) in files.iter().zip(&texts) {
        for s in statements(text).map_err(|e| format!("{file}: {e}"))? {
            sql.push(Statement { file, text: s });
        }
    }
    let mut templates: Vec<_> = fs::read_dir("sql/upgrade")
        .map_err(|e| format!("read sql/upgrade: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    templates.sort();
    for template in templates {
        let name = template
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let path = template.display().to_string();
        let script = assemble(&read(&path)?, &sql).map_err(|e| format!("{path}: {e}"))?;
        let script = format!(
            "-- Generated at build time by build.rs from {path} and the sql/ files; do not edit.\n{script}"
        );
        let out = Path::new("sql").join(name);
        if fs::read_to_string(&out).ok().as_deref() != Some(script.as_str()) {
            fs::write(&out, script).map_err(|e| format!("write {}: {e}", out.display()))?;
        }
    }
    Ok(())
}
