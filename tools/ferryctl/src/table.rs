//! Text tables for list commands: every column as wide as its widest cell, so the
//! columns line up whatever the names and numbers are.

#[derive(Clone, Copy)]
pub enum Align {
    Left,
    Right,
}

/// Renders a header row and `rows` with two spaces between columns; the last column
/// is not padded (no trailing blanks). Lines end with `\n`.
pub fn render(header: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let head: Vec<String> = header.iter().map(|(h, _)| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&head).chain(rows) {
        let last = row.len().min(header.len()).saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(header.len()) {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            match header[i].1 {
                Align::Right => {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
                Align::Left => {
                    line.push_str(cell);
                    if i < last {
                        line.push_str(&" ".repeat(pad));
                    }
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_whatever_the_widths() {
        let rows = vec![
            vec!["a".to_string(), "7".to_string(), "x".to_string()],
            vec![
                "a-very-long-bookmark-name-indeed".to_string(),
                "123456789012345".to_string(),
                "2026-12-06T22:00:00.123456789Z".to_string(),
            ],
        ];
        let text = render(
            &[
                ("NAME", Align::Left),
                ("SEQ", Align::Right),
                ("TIME", Align::Left),
            ],
            &rows,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        // TIME starts at one column and right-aligned SEQ ends at one, in every line.
        let starts = |cells: [&str; 3]| -> Vec<usize> {
            cells
                .iter()
                .zip(&lines)
                .map(|(c, l)| l.find(c).unwrap())
                .collect()
        };
        let time = starts(["TIME", "x", "2026"]);
        assert!(time.windows(2).all(|w| w[0] == w[1]), "{text}");
        let seq_cells = ["SEQ", "7", "123456789012345"];
        let seq_end: Vec<usize> = starts(seq_cells)
            .iter()
            .zip(seq_cells)
            .map(|(s, c)| s + c.len())
            .collect();
        assert!(seq_end.windows(2).all(|w| w[0] == w[1]), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')));
    }
}
