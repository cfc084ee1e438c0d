"""The browser the Flower and console tests drive renders a page and runs its script."""

import http.server
import threading

from tests.browser_support import headless_chromium


def test_headless_chromium_runs_a_page_script(tmp_path):
    (tmp_path / "index.html").write_text("<html><body><p id=out></p>"
                                         "<script>document.getElementById('out').textContent = 6 * 7</script></body></html>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with headless_chromium() as browser:
            browser.get(f"http://127.0.0.1:{server.server_port}/index.html")
            assert browser.find_element("id", "out").text == "42"
    finally:
        server.shutdown()
