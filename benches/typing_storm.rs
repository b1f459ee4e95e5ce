fn main() {
    eprintln!("not written yet");
}
